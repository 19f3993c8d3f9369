"""`apibox prices`: the price of every model now, and the changes announced for later."""

from __future__ import annotations

from datetime import UTC, datetime

from apibox.cli.common import ConfigOption, JsonOption, handles_errors, print_json, print_table
from apibox.cli.render import table, when
from apibox.config import load_settings
from apibox.money import format_usd
from apibox.views import iso, price_json


@handles_errors
def prices(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Current and scheduled prices per model (USD per 1M tokens), and the group multipliers."""
    settings = load_settings(config)
    now = datetime.now(UTC)
    rows = []
    for model in settings.models:
        rows.append({"model": model.name, "effective_from": None, "current": True,
                     **price_json(model.price_at(now))})
        for starts, price in model.schedule:
            if starts > now:
                rows.append({"model": model.name, "effective_from": iso(starts), "current": False,
                             **price_json(price)})
    groups = {name: {"multiplier": format_usd(g.multiplier), "models": list(g.models) or None}
              for name, g in settings.groups.items()}
    if as_json:
        print_json({"prices": rows, "groups": groups})
        return
    columns = ["model", "from", "input", "output", "cached input", "cache write", "cache write 1h", "reasoning",
               "per request"]
    print_table(table(None, columns, [
        [r["model"], "now" if r["current"] else when(datetime.fromisoformat(r["effective_from"])), r["input"],
         r["output"], r.get("cached_input", "=input"), r.get("cache_write", "=input"),
         r.get("cache_write_1h", "=cache write"), r.get("reasoning", "=output"), r.get("per_request_usd", "-")]
        for r in rows], right=columns[2:]))
    if groups:
        print_table(table("groups", ["group", "multiplier", "models"],
                            [[name, g["multiplier"], ", ".join(g["models"] or ["all"])] for name, g in groups.items()],
                            right=("multiplier",)))
