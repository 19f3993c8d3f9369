"""`apibox keys ...`: create (the secret is printed once), update, list, show, revoke."""

from __future__ import annotations

from typing import Annotated

import typer

from apibox import accounts, bus
from apibox.cli.common import (
    AfterOption,
    ConfigOption,
    JsonOption,
    LimitOption,
    console,
    fail,
    handles_errors,
    next_page_hint,
    print_json,
    print_table,
    with_store,
)
from apibox.cli.render import keys_table, table, when
from apibox.models import ApiKey
from apibox.money import format_usd
from apibox.views import key_json

app = typer.Typer(help="Create and manage API keys. A key's secret is shown once, at creation.",
                  no_args_is_help=True)

KeyArg = Annotated[str, typer.Argument(help="The key's id (see `apibox keys list`).", show_default=False)]


def _split(values: list[str] | None, option: str) -> tuple[str, ...]:
    """A list option's items, comma-separated or repeated, each once. Given but naming nothing
    (``--models ''``) is refused: it would read as no limit at all."""
    items = tuple(dict.fromkeys(part.strip() for value in values or () for part in value.split(",") if part.strip()))
    if values and not items:
        raise fail(f"{option} names nothing; leave it out for no limit")
    return items


@app.command("create")
@handles_errors
def create(
    user: Annotated[str, typer.Argument(help="The user's email or id.", show_default=False)],
    name: Annotated[str, typer.Option("--name", help="A label to tell keys apart.")] = "",
    models: Annotated[list[str] | None, typer.Option("--models", help="Allowed models, comma-separated "
                                                     "(default: all).")] = None,
    budget: Annotated[str | None, typer.Option("--budget", help="Most this key may spend over its life, USD.")] = None,
    expires: Annotated[str | None, typer.Option("--expires", help="Expiry: a duration like 30d or a date.")] = None,
    rpm: Annotated[int | None, typer.Option("--rpm", help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", help="Tokens per minute.")] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", help="Requests at once.")] = None,
    allow_ip: Annotated[list[str] | None, typer.Option("--allow-ip", help="Allowed client IP or CIDR "
                                                       "(repeatable).")] = None,
    config: ConfigOption = None, as_json: JsonOption = False,
) -> None:
    """Create an API key for a user and print its secret (the only time it is shown)."""
    options = accounts.KeyOptions(name=name, models=_split(models, '--models'), budget=budget, expires=expires, rpm=rpm,
                                  tpm=tpm, concurrency=concurrency, allow_ips=_split(allow_ip, '--allow-ip'))
    new = with_store(config, lambda store, settings: accounts.create_key(
        store, user, options, known_models=settings.model_index()))
    if as_json:
        print_json({**key_json(new.key), "key": new.secret})
        return
    console.print(f"Created key {new.key.id} for user {new.key.user_id}.")
    console.print("Secret (shown only now; store it safely):")
    console.print(new.secret, soft_wrap=True)


@app.command("update")
@handles_errors
def update(
    key: KeyArg,
    name: Annotated[str | None, typer.Option("--name", help="A new label.", show_default=False)] = None,
    models: Annotated[list[str] | None, typer.Option(
        "--models", help="Allowed models, comma-separated; 'all' for every model.", show_default=False)] = None,
    budget: Annotated[str | None, typer.Option(
        "--budget", help="Most this key may spend over its life, USD; 'none' for no limit. What it has spent "
        "stays.", show_default=False)] = None,
    expires: Annotated[str | None, typer.Option(
        "--expires", help="A duration like 30d or a date; 'never'.", show_default=False)] = None,
    rpm: Annotated[str | None, typer.Option(
        "--rpm", help="Requests per minute; 'default' for the config's.", show_default=False)] = None,
    tpm: Annotated[str | None, typer.Option(
        "--tpm", help="Tokens per minute; 'default' for the config's.", show_default=False)] = None,
    concurrency: Annotated[str | None, typer.Option(
        "--concurrency", help="Requests at once; 'default' for the config's.", show_default=False)] = None,
    allow_ip: Annotated[list[str] | None, typer.Option(
        "--allow-ip", help="Allowed client IP or CIDR (repeatable; replaces the list); 'any'.",
        show_default=False)] = None,
    config: ConfigOption = None, as_json: JsonOption = False,
) -> None:
    """Change a key's settings; those not given stay, and so does its secret.

    A running gateway applies the change within a second."""
    given = {"name": name, "budget": budget, "expires": expires, "rpm": rpm, "tpm": tpm, "concurrency": concurrency,
             "models": None if models is None else _split(models, "--models"),
             "allow_ips": None if allow_ip is None else _split(allow_ip, "--allow-ip")}
    changes = accounts.KeyChanges(**{field: value for field, value in given.items() if value is not None})
    updated = with_store(config, lambda store, settings: accounts.update_key(
        store, key, changes, known_models=settings.model_index(), notify=bus.publisher(settings)))
    _print_key(updated, as_json)


@app.command("list")
@handles_errors
def list_(user: Annotated[str | None, typer.Option("--user", help="Only this user's keys (email or id).")] = None,
          after: AfterOption = None, limit: LimitOption = None, config: ConfigOption = None,
          as_json: JsonOption = False) -> None:
    """List keys, in the order they were created (never their secrets)."""
    page = accounts.page_of(after, limit)
    keys = with_store(config, lambda store, _: accounts.list_keys(store, user, page))
    if as_json:
        print_json([key_json(k) for k in keys])
    elif not keys:
        console.print("No keys after that id." if page.after else "No keys. Create one with: apibox keys create USER")
    else:
        print_table(keys_table(keys))
    next_page_hint(page, [k.id for k in keys], "apibox keys list" + (f" --user {user}" if user else ""))


def _print_key(key: ApiKey, as_json: bool) -> None:
    if as_json:
        print_json(key_json(key))
        return
    print_table(table(None, ["field", "value"], [
        ("id", key.id), ("user", key.user_id), ("name", key.name), ("prefix", key.prefix), ("status", key.status),
        ("models", ",".join(key.models) or "all"),
        ("budget", format_usd(key.budget) if key.budget is not None else "no limit"),
        ("spent", format_usd(key.spent)), ("expires", when(key.expires_at)),
        # a limit the key does not set is the config's limits.key default
        *((name, "default" if value is None else value)
          for name, value in (("rpm", key.rpm), ("tpm", key.tpm), ("concurrency", key.concurrency))),
        ("allowed IPs", ",".join(key.allow_ips) or "any"), ("created", when(key.created_at)),
        ("last used", when(key.last_used_at)), ("revoked", when(key.revoked_at))]))


@app.command("show")
@handles_errors
def show(key: KeyArg, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Show one key's settings and spend (never its secret)."""
    _print_key(with_store(config, lambda store, _: accounts.show_key(store, key)), as_json)


@app.command("revoke")
@handles_errors
def revoke(key: KeyArg, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Revoke a key: a running gateway refuses it within a second."""
    revoked = with_store(config, lambda store, settings: accounts.revoke_key(
        store, key, notify=bus.publisher(settings)))
    if as_json:
        print_json(key_json(revoked))
    else:
        console.print(f"Revoked key {revoked.id} ({revoked.prefix}).")
