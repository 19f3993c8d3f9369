"""What a key's holder can ask about their own money: ``GET /v1/me`` and the legacy OpenAI
billing endpoints that chat apps poll for a balance and a usage figure.

The two legacy shapes are the ones OpenAI's dashboard API returned and that one-api and
new-api still serve (songquanpeng/one-api ``controller/billing.go`` and ``router/dashboard.go``;
QuantumNous/new-api ``controller/billing.go``). Clients read them like ChatGPT-Next-Web's
``ChatGPTApi.usage()`` (``app/client/platforms/openai.ts``): ``used = Math.round(total_usage) / 100``
and ``total = hard_limit_usd``, so ``total_usage`` is in **cents** and ``hard_limit_usd`` in USD;
a recorded OpenAI reply (felipemeres/dashboard ``mockFetchUsageApi.js``) lists every day of the
range at 00:00 UTC in Unix seconds with ``line_items[].cost`` in cents too, which dashboards divide by
100; balance checkers compute what is left as ``hard_limit_usd - total_usage / 100``.

So the two figures are scoped alike and ``hard_limit_usd`` is "used + still spendable": minus the
usage of all time it leaves exactly what can still be spent. For a key with a budget both are the
key's (its own spend, plus what its budget and the user's balance still allow, the smaller of the
two); for any other key both are the user's (everything the user was charged, plus the balance),
as one-api reports a token's ``remain + used`` quota and its ``used`` quota. Dates are UTC days and
``end_date`` is exclusive, as in OpenAI's API (ChatGPT-Next-Web asks for the first of the month to
tomorrow). Sums are integer micro-USD from the usage report (the same rows as the ledger's charges);
they become JSON numbers once, at the end.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

from aiohttp import web

from apibox.auth import Caller
from apibox.config import LimitSet
from apibox.errors import InvalidRequest
from apibox.gateway.admission import limit_subjects
from apibox.gateway.appkeys import GATEWAY
from apibox.gateway.openai import authenticate
from apibox.models import ApiKey, ReportRow
from apibox.money import format_usd, usd_number
from apibox.store.base import Store, UsageFilter

USAGE_MAX_DAYS = 100  # OpenAI's limit on one usage query; clients ask for at most 100 days
_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def cents_number(micro: int) -> float:
    """Micro-USD as a JSON number of US cents, exact below $1 billion (at most 15 significant
    digits, so the nearest double prints back as the same decimal)."""
    return usd_number(micro * 100)


def _report_total(rows: list[ReportRow]) -> int:
    return sum(row.cost for row in rows)


def _scope(caller: Caller, key: ApiKey) -> UsageFilter:
    """Whose usage the billing endpoints report: the key's if it has a budget, else the user's."""
    return UsageFilter(key_id=key.id) if key.budget is not None else UsageFilter(user_id=caller.user.id)


async def _fresh_key(store: Store, caller: Caller) -> ApiKey:
    # The authenticated key may come from the auth cache; read its spend fresh, like the balance.
    return await store.get_key(caller.key.id) or caller.key


async def subscription(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    store = request.app[GATEWAY].store
    key = await _fresh_key(store, caller)
    balance = (await store.get_balance(caller.user.id)).balance
    used = _report_total(await store.usage_report((), _scope(caller, key)))
    spendable = balance if key.budget is None else max(0, min(key.budget - key.spent, balance))
    limit = usd_number(used + spendable)
    # one-api/new-api send these three equal, has_payment_method true and access_until 0 for "never".
    return web.json_response({
        "object": "billing_subscription",
        "has_payment_method": True,
        "soft_limit_usd": limit,
        "hard_limit_usd": limit,
        "system_hard_limit_usd": limit,
        "access_until": int(key.expires_at.timestamp()) if key.expires_at else 0,
        "plan": {"title": caller.user.group, "id": caller.user.group},
    })


def _date_param(request: web.Request, name: str) -> date:
    raw = request.query.get(name)
    if raw is None or not raw.strip():
        raise InvalidRequest(f"Missing required parameter: '{name}' (a date such as 2026-01-31).", param=name)
    try:
        if not _DATE.match(raw):
            raise ValueError(raw)
        return date.fromisoformat(raw)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be a date in the form YYYY-MM-DD, not {raw[:40]!r}.", param=name) from None


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def usage(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    start, end = _date_param(request, "start_date"), _date_param(request, "end_date")
    if end <= start:
        raise InvalidRequest(f"'end_date' ({end}) must be after 'start_date' ({start}); the range includes "
                             "start_date and excludes end_date.", param="end_date")
    days = (end - start).days
    if days > USAGE_MAX_DAYS:
        raise InvalidRequest(f"The range from 'start_date' to 'end_date' is {days} days; ask for at most "
                             f"{USAGE_MAX_DAYS} days at a time.", param="end_date")
    store = request.app[GATEWAY].store
    key = await _fresh_key(store, caller)
    scope = _scope(caller, key)
    where = UsageFilter(since=_midnight(start), until=_midnight(end), user_id=scope.user_id, key_id=scope.key_id)
    rows = await store.usage_report(("day", "model"), where)
    by_day: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_day.setdefault(row.group["day"], []).append({"name": row.group["model"], "cost": cents_number(row.cost)})
    # Every day of the range, as OpenAI listed them (charts expect no gaps); costs in cents.
    daily_costs = [{"timestamp": int(_midnight(day).timestamp()), "line_items": by_day.get(day.isoformat(), [])}
                   for day in (start + timedelta(days=i) for i in range(days))]
    return web.json_response({"object": "list", "daily_costs": daily_costs,
                              "total_usage": cents_number(_report_total(rows))})


def _limits_json(limits: LimitSet) -> dict[str, int | None]:
    return {"rpm": limits.rpm, "tpm": limits.tpm, "concurrency": limits.concurrency}


def _month(now: datetime) -> tuple[datetime, datetime]:
    """The calendar month (UTC) that ``now`` falls in, as [first instant, first instant of the next)."""
    first = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (first + timedelta(days=32)).replace(day=1)
    return first, following


async def me(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    gateway = request.app[GATEWAY]
    store = gateway.store
    balance = await store.get_balance(caller.user.id)
    key, user = await _fresh_key(store, caller), caller.user
    # The limits a request really meets: the ones the limiter is given (the key's own, else the defaults).
    subjects = {s.name: s.limits for s in limit_subjects(gateway, Caller(key=key, user=user))}
    since, until = _month(gateway.clock())
    month = await store.usage_report((), UsageFilter(since=since, until=until, key_id=key.id))
    requests = sum(r.requests for r in month)
    prompt = sum(r.prompt_tokens for r in month)
    completion = sum(r.completion_tokens for r in month)
    return web.json_response({
        "user": {"id": user.id, "email": user.email, "name": user.name, "group": user.group,
                 "state": user.state.value},
        "key": {"id": key.id, "name": key.name, "prefix": key.prefix, "models": list(key.models) or None,
                "budget_usd": format_usd(key.budget) if key.budget is not None else None,
                "spent_usd": format_usd(key.spent),
                "expires_at": key.expires_at.isoformat() if key.expires_at else None,
                "limits": {"rpm": key.rpm, "tpm": key.tpm, "concurrency": key.concurrency}},
        "balance": {"balance_usd": format_usd(balance.balance), "held_usd": format_usd(balance.held),
                    "available_usd": format_usd(balance.available)},
        "limits": {"key": _limits_json(subjects.get(f"key:{key.id}", LimitSet())),
                   "user": _limits_json(subjects.get(f"user:{user.id}", LimitSet()))},
        "usage_this_month": {"since": since.isoformat(), "until": until.isoformat(), "requests": requests,
                             "prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion, "cost_usd": format_usd(_report_total(month))},
    })


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/me", me)
    # Both prefixes, as one-api serves them: ChatGPT-Next-Web joins "dashboard/billing/..." to a base
    # URL without /v1 (its chat path is "v1/chat/completions"), other clients add /v1.
    for prefix in ("/v1", ""):
        app.router.add_get(f"{prefix}/dashboard/billing/subscription", subscription)
        app.router.add_get(f"{prefix}/dashboard/billing/usage", usage)
