"""Domain objects as the JSON shapes scripts rely on, shared by the CLI's --json and the admin API.

USD amounts are decimal strings with six places (``"9.999850"``); times are ISO 8601 UTC.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from apibox.config import ModelSettings
from apibox.models import ApiKey, Balance, LedgerEntry, User
from apibox.money import format_usd
from apibox.pricing import MULTIPLIER_ONE, Price


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def user_json(user: User) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "name": user.name, "group": user.group, "state": user.state.value,
            "state_reason": user.state_reason, "created_at": iso(user.created_at)}


def balance_json(user: User, balance: Balance) -> dict[str, Any]:
    return {"user_id": user.id, "email": user.email, "balance_usd": format_usd(balance.balance),
            "held_usd": format_usd(balance.held), "available_usd": format_usd(balance.available)}


def key_json(key: ApiKey) -> dict[str, Any]:
    return {"id": key.id, "user_id": key.user_id, "name": key.name, "prefix": key.prefix, "status": key.status,
            "models": list(key.models), "budget_usd": format_usd(key.budget) if key.budget is not None else None,
            "spent_usd": format_usd(key.spent), "expires_at": iso(key.expires_at), "rpm": key.rpm, "tpm": key.tpm,
            "concurrency": key.concurrency, "allow_ips": list(key.allow_ips), "created_at": iso(key.created_at),
            "last_used_at": iso(key.last_used_at), "revoked_at": iso(key.revoked_at)}


def entry_json(entry: LedgerEntry) -> dict[str, Any]:
    return {"id": entry.id, "created_at": iso(entry.created_at), "kind": entry.kind.value,
            "amount_usd": format_usd(entry.amount), "balance_after_usd": format_usd(entry.balance_after),
            "note": entry.note, "reference": entry.reference, "actor": entry.actor, "usage_id": entry.usage_id}


def price_json(price: Price) -> dict[str, Any]:
    """A list price in USD per 1M tokens (and USD per request for a fee), as decimal strings."""
    out: dict[str, Any] = {"unit": "USD per 1M tokens", "input": format_usd(price.input),
                           "output": format_usd(price.output)}
    for name, value in (("cached_input", price.cached_input), ("cache_write", price.cache_write),
                        ("cache_write_1h", price.cache_write_1h), ("reasoning", price.reasoning)):
        if value is not None:
            out[name] = format_usd(value)
    if price.per_request:
        out["per_request_usd"] = format_usd(price.per_request)
    return out


def model_pricing_json(model: ModelSettings, now: datetime, multiplier: int = MULTIPLIER_ONE) -> dict[str, Any]:
    """The price in force now, the caller's group multiplier if not 1, and the next announced change."""
    out = price_json(model.price_at(now))
    if multiplier != MULTIPLIER_ONE:
        out["multiplier"] = format_usd(multiplier)
    upcoming = model.next_change(now)
    if upcoming is not None:
        out["next"] = {"effective_from": iso(upcoming[0]), **price_json(upcoming[1])}
    return out
