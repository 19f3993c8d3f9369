"""The `apibox` command: the operator's whole business from one CLI."""

from __future__ import annotations

import typer

from apibox import __version__
from apibox.cli import config_cmd, db, keys, money, prices, serve, usage, users

app = typer.Typer(
    name="apibox",
    help="apibox: a self-hosted LLM API gateway with prepaid balances. Serve it, then manage users, keys and money.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
serve.register(app)
app.add_typer(users.app, name="users")
app.add_typer(keys.app, name="keys")
money.register(app)
app.command("prices")(prices.prices)
app.add_typer(usage.app, name="usage")
app.add_typer(config_cmd.app, name="config")
app.add_typer(db.app, name="db")


@app.command("version")
def version() -> None:
    """Print the apibox version."""
    typer.echo(__version__)


def run() -> None:
    app()
