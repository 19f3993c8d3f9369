"""`apibox config check / reload`: validate and print the resolved configuration (secrets masked);
ask running gateways to reload it."""

from __future__ import annotations

import asyncio
from typing import Any

import typer

from apibox.bus import Change, publisher
from apibox.cli.common import ConfigOption, JsonOption, console, fail, handles_errors, print_json
from apibox.config import Settings, load_settings, masked, masked_url
from apibox.money import format_usd

app = typer.Typer(help="Configuration.", no_args_is_help=True)


def describe(settings: Settings) -> dict[str, Any]:
    """The resolved settings as plain data, with every secret masked."""
    def price(p: Any) -> dict[str, str]:
        return {k: format_usd(v) for k, v in (("input", p.input), ("output", p.output),
                ("cached_input", p.cached_input), ("cache_write", p.cache_write),
                ("cache_write_1h", p.cache_write_1h), ("reasoning", p.reasoning))
                if v is not None}
    return {
        "source": settings.source,
        "server": {"host": settings.server.host, "port": settings.server.port,
                   "admin_key": masked(settings.server.admin_key), "max_body_mb": settings.server.max_body_mb,
                   "access_log": settings.server.access_log, "cors_origins": list(settings.server.cors_origins),
                   "stream_keepalive_seconds": settings.server.stream_keepalive_seconds,
                   "shutdown_seconds": settings.server.shutdown_seconds},
        "database": {"url": masked_url(settings.database.url)},
        "providers": [{"name": p.name, "type": p.type, "base_url": masked_url(p.base_url), "api_key": masked(p.api_key),
                       "headers": {k: masked(v) for k, v in p.headers.items()},
                       "timeouts": {"connect": p.timeouts.connect, "first_byte": p.timeouts.first_byte,
                                    "idle": p.timeouts.idle}, "stream_usage": p.stream_usage,
                       "proxy": masked_url(p.proxy) if p.proxy else None,
                       **({"max_tokens_field": p.max_tokens_field} if p.type == "openai" else {})}
                      for p in settings.providers],
        "models": [{"name": m.name, "kind": m.kind, "aliases": list(m.aliases),
                    "max_output_tokens": m.max_output_tokens, "price_usd_per_1m": price(m.price),
                    "routes": [{"provider": r.provider, "model": r.model, "weight": r.weight, "priority": r.priority}
                               for r in m.routes]} for m in settings.models],
        "limits": {"key": vars_of(settings.limits.key), "user": vars_of(settings.limits.user)},
        "redis": {"url": masked_url(settings.redis.url), "prefix": settings.redis.prefix,
                  "timeout": settings.redis.timeout} if settings.redis else None,
    }


def vars_of(limit: Any) -> dict[str, Any]:
    return {"rpm": limit.rpm, "tpm": limit.tpm, "concurrency": limit.concurrency}


@app.command("check")
@handles_errors
def check(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Validate the configuration and print it as resolved (secrets masked)."""
    data = describe(load_settings(config))
    if as_json:
        print_json(data)
        return
    console.print(f"OK: {data['source']}", style="green")
    console.print(f"server: {data['server']['host']}:{data['server']['port']}   database: {data['database']['url']}"
                  f"   access log: {data['server']['access_log']}")
    redis = data["redis"]
    console.print(f"redis: {redis['url']} (prefix {redis['prefix']}, timeout {redis['timeout']} s): shared limits"
                  if redis else "redis: none (limits kept in each process)")
    for p in data["providers"]:
        where = f" {p['base_url']}" if p["base_url"] else ""  # the built-in echo provider has neither
        console.print(f"provider {p['name']} ({p['type']}){where} api_key={p['api_key'] or 'none'}")
    for m in data["models"]:
        routes = ", ".join(f"{r['provider']}:{r['model']}" for r in m["routes"])
        prices = " ".join(f"{k}={v}" for k, v in m["price_usd_per_1m"].items())
        console.print(f"model {m['name']} -> {routes}  [{prices} USD/1M]")


@app.command("reload")
@handles_errors
def reload(config: ConfigOption = None) -> None:
    """Tell every running gateway to reload its config file (models, prices, providers, groups, limits).
    Needs redis: in the config; without it, send SIGHUP to the gateway (systemctl reload apibox)."""
    settings = load_settings(config)  # a file that does not validate is refused here, before any gateway sees it
    if settings.redis is None:
        raise fail("no redis: section in the config, so running gateways cannot be told from here; send the "
                   "gateway SIGHUP instead (systemctl reload apibox, or kill -HUP <pid of apibox serve>)")
    asyncio.run(publisher(settings).changed(Change(config=True)))
    console.print(f"Asked every gateway listening on {masked_url(settings.redis.url)} to reload its config file "
                  f"({settings.source} validates).")
