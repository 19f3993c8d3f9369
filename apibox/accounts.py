"""Use-cases shared by the CLI and (later) the admin API: users, keys, top-ups, adjustments.

Each function validates its input completely before it writes anything, so a bad argument
changes nothing. Those that change what a running gateway caches about a key or a user
announce it through ``notify`` once written (``apibox.bus``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from apibox.bus import NO_NOTIFIER, Change, Notifier
from apibox.errors import InvalidRequest, NotFound
from apibox.keys import display_prefix, generate_key, hash_key
from apibox.models import (
    ALL_USERS,
    EVERY,
    ApiKey,
    Balance,
    LedgerEntry,
    LedgerKind,
    NewKey,
    Page,
    User,
    UserFilter,
    UserOverview,
    UserState,
)
from apibox.money import MoneyError, parse_usd
from apibox.plaintext import first_control
from apibox.store.base import Credit, CreditResult, KeySpec, Store
from apibox.timeparse import TimeParseError, parse_expiry
from apibox.views import entry_json, key_json, user_json

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_TEXT = 500
MAX_ID = 2**63 - 1  # the largest id (and limit) the database can hold


def _as_id(text: str) -> int | None:
    """``text`` as a row id, or None when it is not one (``²`` is a digit to str.isdigit, not to int)."""
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_ID:
        return None
    return int(text)


def whole_number(value: int | str, name: str, least: int, most: int = MAX_ID) -> int:
    """A whole number from ``least`` to ``most`` (by default what the database holds), given as a
    number (the CLI's options, JSON) or as text (a query)."""
    number = _as_id(value) if isinstance(value, str) else value
    if number is None or not least <= number <= most:
        raise InvalidRequest(f"{name} must be a whole number from {least} to {most}, got {value!r}", param=name)
    return number


def page_of(after: int | str | None, limit: int | str | None) -> Page:
    """A listing's page as the CLI's options or the admin API's query give it: ``after`` an item's
    id (0, or left out, for the first page), ``limit`` how many (every one when left out)."""
    return Page(after=0 if after is None else whole_number(after, "after", 0),
                limit=None if limit is None else whole_number(limit, "limit", 1))


def normalize_email(email: str) -> str:
    """Emails are unique case-insensitively: one account per person."""
    cleaned = email.strip().lower()
    if not _EMAIL.match(cleaned) or len(cleaned) > 254 or first_control(cleaned) is not None:
        raise InvalidRequest(f"{email!r} is not an email address", param="email")
    return cleaned


def _text(value: str | None, field: str) -> str | None:
    """A name, note, reference or reason: at most ``MAX_TEXT`` characters on one line (see ``apibox.plaintext``)."""
    if value is None:
        return None
    if len(value) > MAX_TEXT:
        raise InvalidRequest(f"{field} is too long (at most {MAX_TEXT} characters)", param=field)
    control = first_control(value)
    if control is not None:
        raise InvalidRequest(f"{field} must be one line of text without control characters; it has {control!r}",
                             param=field)
    return value


def _group(value: str | None, known: Iterable[str] | None = None) -> str | None:
    """A group name; when the configured groups are given, one of them (or "default")."""
    if value is not None and not _NAME.match(value):
        raise InvalidRequest(f"group {value!r} must be 1-64 letters, digits, '.', '_' or '-'", param="group")
    if value is not None and known is not None and value != "default" and value not in set(known):
        names = ", ".join(["default", *sorted(known)])
        raise InvalidRequest(f"unknown group {value!r} (configured: {names})", param="group")
    return value


async def resolve_user(store: Store, ref: str | int) -> User:
    """A user from an id (``12``) or an email (``ann@example.com``)."""
    text = str(ref).strip()
    user = None
    if text.isdigit():
        user_id = _as_id(text)
        user = await store.get_user(user_id) if user_id is not None else None
    elif "@" in text:
        user = await store.find_user_by_email(text.lower())
    if user is None:
        raise NotFound(f"no user {text!r} (give an email or a user id; `apibox users list` shows them)")
    return user


async def _log(store: Store, actor: str, action: str, target: str, before: dict[str, Any] | None,
               after: dict[str, Any] | None) -> None:
    """Every change an operator makes, from the CLI or the admin API, goes to the admin log; an
    action that found things already as asked (a revoked key revoked again) changed nothing."""
    if before != after:
        await store.log_admin_action(actor, action, target, before, after)


async def create_user(store: Store, email: str, name: str = "", group: str = "default", *,
                      actor: str = "cli", known_groups: Iterable[str] | None = None) -> User:
    user = await store.create_user(normalize_email(email), _text(name, "name") or "",
                                   _group(group, known_groups) or "default")
    await _log(store, actor, "user.create", f"user:{user.id}", None, user_json(user))
    return user


def user_state(text: object) -> UserState:
    """An account state by its name, as the admin API's body or a listing's filter gives it."""
    try:
        return UserState(text)
    except ValueError:
        names = ", ".join(state.value for state in UserState)
        raise InvalidRequest(f"state must be one of {names}, got {text!r}", param="state") from None


def user_filter(state: str | None = None, group: str | None = None, below: str | None = None) -> UserFilter:
    """The users a listing asks for, as the CLI's options or the admin API's query give them:
    in a state, in a group, with less than ``below`` USD to spend."""
    try:
        limit = parse_usd(below, allow_zero=True) if below is not None else None
    except MoneyError as exc:
        raise InvalidRequest(f"below: {exc}", param="below") from None
    return UserFilter(state=user_state(state) if state is not None else None, group=_group(group), below=limit)


async def list_users(store: Store, page: Page = EVERY, only: UserFilter = ALL_USERS) -> list[UserOverview]:
    return await store.list_users(page, only)


@dataclass(frozen=True, slots=True)
class UserDetail:
    user: User
    balance: Balance
    keys: list[ApiKey]


async def show_user(store: Store, ref: str) -> UserDetail:
    user = await resolve_user(store, ref)
    return UserDetail(user, await store.get_balance(user.id), await store.list_keys(user.id))


async def update_user(store: Store, ref: str, *, name: str | None = None, group: str | None = None,
                      actor: str = "cli", known_groups: Iterable[str] | None = None,
                      notify: Notifier = NO_NOTIFIER) -> User:
    name, group = _text(name, "name"), _group(group, known_groups)
    if name is None and group is None:
        raise InvalidRequest("nothing to change: give a name or a group")
    user = await resolve_user(store, ref)
    updated = await store.update_user(user.id, name=name, group=group)
    await _log(store, actor, "user.update", f"user:{user.id}", user_json(user), user_json(updated))
    await notify.changed(Change(user_id=user.id))  # the group sets prices and models
    return updated


async def set_user_state(store: Store, ref: str, state: UserState, reason: str = "", *,
                         actor: str = "cli", notify: Notifier = NO_NOTIFIER) -> User:
    """Suspend, ban, close or reactivate. Closing also revokes every key; the balance stays
    for a manual refund."""
    _text(reason, "reason")
    user = await resolve_user(store, ref)
    if user.state == UserState.CLOSED and state != UserState.CLOSED:
        raise InvalidRequest(f"user {user.email} is closed; a closed account cannot be reopened")
    if state == UserState.CLOSED:
        await store.revoke_user_keys(user.id)
    changed = await store.set_user_state(user.id, state, reason)
    await _log(store, actor, f"user.{state.value}", f"user:{user.id}", user_json(user), user_json(changed))
    await notify.changed(Change(user_id=user.id))
    return changed


@dataclass(frozen=True, slots=True)
class KeyOptions:
    name: str = ""
    models: tuple[str, ...] = ()
    budget: str | None = None  # USD, as typed
    expires: str | None = None  # 30d or a date
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    allow_ips: tuple[str, ...] = ()


class Keep:
    """A setting ``KeyChanges`` leaves as it is."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = Keep()
# What a key setting is changed to take it away: the CLI's words (the admin API's JSON says null or []).
NO_BUDGET, NEVER, DEFAULT_LIMIT, ALL_MODELS, ANY_ADDRESS = "none", "never", "default", "all", "any"


@dataclass(frozen=True, slots=True)
class KeyChanges:
    """What `keys update` changes on a key; every setting left at KEEP stays as it is. None (or the
    word) takes one away: no budget, never expires, the config's default limit."""

    name: str | Keep = KEEP
    models: tuple[str, ...] | Keep = KEEP  # () or ("all",): every model
    budget: str | Keep | None = KEEP
    expires: str | Keep | None = KEEP
    rpm: int | str | Keep | None = KEEP
    tpm: int | str | Keep | None = KEEP
    concurrency: int | str | Keep | None = KEEP
    allow_ips: tuple[str, ...] | Keep = KEEP  # () or ("any",): any address


def _models(models: tuple[str, ...], known_models: Iterable[str]) -> tuple[str, ...]:
    known = set(known_models)
    unknown = [m for m in models if m not in known]
    if unknown:
        raise InvalidRequest(f"unknown model {unknown[0]!r} (configured: {', '.join(sorted(known)) or 'none'})",
                             param="models")
    return models


def _budget(text: str) -> int:
    try:
        return parse_usd(text)
    except MoneyError as exc:
        raise InvalidRequest(str(exc), param="budget") from None


def _expiry(text: str, now: datetime) -> datetime:
    try:
        return parse_expiry(text, now)
    except TimeParseError as exc:
        raise InvalidRequest(str(exc), param="expires") from None


def _limit(field: str, value: int | str | None) -> int | None:
    """A requests, tokens or concurrency limit: None (the word "default" too) for the config's default."""
    if value is None or value == DEFAULT_LIMIT:
        return None
    return whole_number(value, field, 1)


def _addresses(cidrs: tuple[str, ...]) -> tuple[str, ...]:
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise InvalidRequest(f"{cidr!r} is not an IP address or CIDR range", param="allow_ips") from None
    return cidrs


async def create_key(store: Store, ref: str, options: KeyOptions, *, known_models: Iterable[str],
                     now: datetime | None = None, actor: str = "cli") -> NewKey:
    """Create a key and return its secret, which is never available again."""
    now = now or datetime.now(UTC)
    models = _models(options.models, known_models)
    budget = _budget(options.budget) if options.budget is not None else None
    expires = _expiry(options.expires, now) if options.expires else None
    limits = {field: _limit(field, getattr(options, field)) for field in ("rpm", "tpm", "concurrency")}
    allow_ips = _addresses(options.allow_ips)
    user = await resolve_user(store, ref)
    if user.state == UserState.CLOSED:
        raise InvalidRequest(f"user {user.email} is closed; it cannot get new keys")
    secret = generate_key()
    key = await store.create_key(KeySpec(
        user_id=user.id, key_hash=hash_key(secret), prefix=display_prefix(secret),
        name=_text(options.name, "name") or "", models=models, budget=budget, expires_at=expires,
        allow_ips=allow_ips, **limits))
    await _log(store, actor, "key.create", f"key:{key.id}", None, key_json(key))  # the secret is never logged
    return NewKey(key=key, secret=secret)


def _key_settings(changes: KeyChanges, known_models: Iterable[str], now: datetime) -> dict[str, Any]:
    """The store's settings (``KEY_SETTINGS``) that ``changes`` sets, each checked."""
    settings: dict[str, Any] = {}
    if not isinstance(changes.name, Keep):
        settings["name"] = _text(changes.name, "name") or ""
    if not isinstance(changes.models, Keep):
        every = changes.models in ((), (ALL_MODELS,))
        settings["models"] = () if every else _models(changes.models, known_models)
    if not isinstance(changes.budget, Keep):
        no_budget = changes.budget in (None, NO_BUDGET)
        settings["budget"] = None if no_budget else _budget(changes.budget)  # type: ignore[arg-type]
    if not isinstance(changes.expires, Keep):
        never = changes.expires in (None, NEVER)
        settings["expires_at"] = None if never else _expiry(changes.expires, now)  # type: ignore[arg-type]
    for field in ("rpm", "tpm", "concurrency"):
        value = getattr(changes, field)
        if not isinstance(value, Keep):
            settings[field] = _limit(field, value)
    if not isinstance(changes.allow_ips, Keep):
        anywhere = changes.allow_ips in ((), (ANY_ADDRESS,))
        settings["allow_ips"] = () if anywhere else _addresses(changes.allow_ips)
    return settings


async def update_key(store: Store, ref: str, changes: KeyChanges, *, known_models: Iterable[str],
                     now: datetime | None = None, actor: str = "cli", notify: Notifier = NO_NOTIFIER) -> ApiKey:
    """Change a key's settings in place (its secret stays): a running gateway applies them within
    a second. Its spend so far stays; a budget under it stops the key."""
    settings = _key_settings(changes, known_models, now or datetime.now(UTC))
    if not settings:
        raise InvalidRequest("nothing to change: give at least one setting")
    key = await show_key(store, ref)
    if key.revoked_at is not None:
        raise InvalidRequest(f"key {key.id} is revoked; a revoked key cannot be changed")
    changed = await store.update_key(key.id, settings)
    await _log(store, actor, "key.update", f"key:{key.id}", key_json(key), key_json(changed))
    await notify.changed(Change(key_id=key.id))
    return changed


async def list_keys(store: Store, user_ref: str | None = None, page: Page = EVERY) -> list[ApiKey]:
    user_id = (await resolve_user(store, user_ref)).id if user_ref else None
    return await store.list_keys(user_id, page)


def _key_id(ref: str | int) -> int:
    text = str(ref).strip()
    key_id = _as_id(text)
    if key_id is None:
        raise NotFound(f"no key {text!r} (give the key's id; `apibox keys list` shows them)")
    return key_id


async def show_key(store: Store, ref: str) -> ApiKey:
    key = await store.get_key(_key_id(ref))
    if key is None:
        raise NotFound(f"no key with id {ref}")
    return key


async def revoke_key(store: Store, ref: str, *, actor: str = "cli", notify: Notifier = NO_NOTIFIER) -> ApiKey:
    key = await show_key(store, ref)
    revoked = await store.revoke_key(key.id)
    await _log(store, actor, "key.revoke", f"key:{key.id}", key_json(key), key_json(revoked))
    await notify.changed(Change(key_id=key.id))
    return revoked


def _amount(text: str, *, signed: bool) -> int:
    try:
        return parse_usd(text, allow_negative=signed)
    except MoneyError as exc:
        raise InvalidRequest(str(exc), param="amount") from None


async def topup(store: Store, ref: str, amount: str, *, note: str = "", reference: str | None = None,
                actor: str = "cli") -> CreditResult:
    """Credit USD to a user; the same ``reference`` twice credits once."""
    micro = _amount(amount, signed=False)
    _text(note, "note")
    if reference is not None and not reference.strip():
        raise InvalidRequest("the reference must not be empty", param="reference")
    user = await resolve_user(store, ref)
    result = await store.credit(Credit(user.id, micro, LedgerKind.TOPUP, note, _text(reference, "reference"), actor))
    if result.created:
        await _log(store, actor, "balance.topup", f"user:{user.id}", None, entry_json(result.entry))
    return result


async def adjust(store: Store, ref: str, amount: str, *, note: str, actor: str = "cli") -> CreditResult:
    """A signed correction with a required note; it cannot take the balance below zero."""
    micro = _amount(amount, signed=True)
    if not note or not note.strip():
        raise InvalidRequest("an adjustment needs a note saying why", param="note")
    _text(note, "note")
    user = await resolve_user(store, ref)
    result = await store.credit(Credit(user.id, micro, LedgerKind.ADJUSTMENT, note, None, actor))
    await _log(store, actor, "balance.adjust", f"user:{user.id}", None, entry_json(result.entry))
    return result


async def balance(store: Store, ref: str) -> tuple[User, Balance]:
    user = await resolve_user(store, ref)
    return user, await store.get_balance(user.id)


async def ledger(store: Store, ref: str, since: datetime | None = None, until: datetime | None = None,
                 page: Page = EVERY) -> tuple[User, list[LedgerEntry]]:
    user = await resolve_user(store, ref)
    return user, await store.ledger(user.id, since, until, page=page)
