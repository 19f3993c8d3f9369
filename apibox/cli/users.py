"""`apibox users ...`: accounts and their states."""

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
    handles_errors,
    next_page_hint,
    print_json,
    print_table,
    with_store,
)
from apibox.cli.render import keys_table, table, users_table, when
from apibox.models import ALL_USERS, User, UserState
from apibox.money import format_usd
from apibox.views import balance_json, key_json, user_json

app = typer.Typer(help="Create, list and manage user accounts.", no_args_is_help=True)

UserArg = Annotated[str, typer.Argument(help="The user's email or id.", show_default=False)]
COMMAND_NAMES = {UserState.SUSPENDED: "suspend", UserState.ACTIVE: "activate", UserState.BANNED: "ban",
                 UserState.CLOSED: "close"}
ReasonOption = Annotated[str, typer.Option("--reason", help="Why (shown to the user in error messages).")]


def _print_user(user: User, as_json: bool, verb: str) -> None:
    if as_json:
        print_json(user_json(user))
    else:
        console.print(f"{verb} user {user.id} <{user.email}> (group {user.group}, {user.state.value})")


@app.command("create")
@handles_errors
def create(email: Annotated[str, typer.Argument(help="Email address; one account per email.")],
           name: Annotated[str, typer.Option("--name", help="Display name.")] = "",
           group: Annotated[str, typer.Option("--group", help="Pricing group.")] = "default",
           config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Create a user account with a zero balance."""
    user = with_store(config, lambda store, settings: accounts.create_user(
        store, email, name, group, known_groups=settings.groups), create=True)  # (the first user may start it)
    _print_user(user, as_json, "Created")


@app.command("list")
@handles_errors
def list_(state: Annotated[str | None, typer.Option("--state", help="Only users in this state: active, "
                                                      "suspended, banned or closed.", show_default=False)] = None,
          group: Annotated[str | None, typer.Option("--group", help="Only users in this pricing group.",
                                                    show_default=False)] = None,
          below: Annotated[str | None, typer.Option("--below", help="Only users with less than this to spend, "
                                                    "USD (balance less holds).", show_default=False)] = None,
          after: AfterOption = None, limit: LimitOption = None, config: ConfigOption = None,
          as_json: JsonOption = False) -> None:
    """List users, in the order they were created, with balance, state and number of active keys."""
    page, only = accounts.page_of(after, limit), accounts.user_filter(state, group, below)
    overviews = with_store(config, lambda store, _: accounts.list_users(store, page, only))
    if as_json:
        print_json([{**user_json(o.user), **balance_json(o.user, o.balance), "keys": o.key_count}
                    for o in overviews])
    elif not overviews:
        console.print("No such users." if only != ALL_USERS else "No users after that id." if page.after
                      else "No users yet. Create one with: apibox users create EMAIL")
    else:
        print_table(users_table(overviews))
    asked = "".join(f" --{name} {value}" for name, value in (("state", state), ("group", group), ("below", below))
                    if value is not None)
    next_page_hint(page, [o.user.id for o in overviews], "apibox users list" + asked)


@app.command("show")
@handles_errors
def show(user: UserArg, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Show one user: details, balance and keys."""
    detail = with_store(config, lambda store, _: accounts.show_user(store, user))
    if as_json:
        print_json({**user_json(detail.user), **balance_json(detail.user, detail.balance),
                    "keys": [key_json(k) for k in detail.keys]})
        return
    u, b = detail.user, detail.balance
    print_table(table(None, ["field", "value"], [
        ("id", u.id), ("email", u.email), ("name", u.name), ("group", u.group),
        ("state", u.state.value + (f" ({u.state_reason})" if u.state_reason else "")),
        ("created", when(u.created_at)), ("balance", format_usd(b.balance)), ("held", format_usd(b.held)),
        ("available", format_usd(b.available))]))
    if detail.keys:
        print_table(keys_table(detail.keys))


@app.command("update")
@handles_errors
def update(user: UserArg, name: Annotated[str | None, typer.Option("--name", help="New display name.")] = None,
           group: Annotated[str | None, typer.Option("--group", help="New pricing group.")] = None,
           config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Change a user's name or group."""
    updated = with_store(config, lambda store, settings: accounts.update_user(
        store, user, name=name, group=group, known_groups=settings.groups, notify=bus.publisher(settings)))
    _print_user(updated, as_json, "Updated")


def _state_command(state: UserState, verb: str, doc: str) -> None:
    @handles_errors
    def command(user: UserArg, reason: ReasonOption = "", config: ConfigOption = None,
                as_json: JsonOption = False) -> None:
        changed = with_store(config, lambda store, settings: accounts.set_user_state(
            store, user, state, reason, notify=bus.publisher(settings)))
        _print_user(changed, as_json, verb)
    command.__doc__ = doc
    app.command(COMMAND_NAMES[state])(command)


_state_command(UserState.SUSPENDED, "Suspended", "Suspend a user: their requests are refused until activated.")
_state_command(UserState.ACTIVE, "Activated", "Reactivate a suspended or banned user.")
_state_command(UserState.BANNED, "Banned", "Ban a user: every request is refused.")
_state_command(UserState.CLOSED, "Closed",
               "Close an account for good: revokes all its keys; the balance stays for a manual refund.")
