"""Reloading a running gateway's config: models, prices, providers, groups, limits and routing.

Triggered by SIGHUP (``systemctl reload``; the supervisor passes it to every worker), by
``POST /admin/reload``, and, with Redis, by ``apibox config reload`` or another gateway's
reload, which every instance hears. Each gateway re-reads its own config file. A file that
does not validate changes nothing: the gateway keeps serving with what it had, and says why.
The server, database and redis sections are bound at start; a change to them is reported as
needing a restart and not applied. Requests in flight finish with the settings they began
with: they hold their own price and route.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from apibox.config import load_settings
from apibox.errors import ApiboxError, ConfigError
from apibox.gateway.context import Gateway
from apibox.providers import build_providers
from apibox.router import Router

log = logging.getLogger("apibox.gateway")
FIXED_AT_START = ("server", "database", "redis")


@dataclass(frozen=True, slots=True)
class Reloaded:
    source: str
    models: int
    providers: int
    needs_restart: tuple[str, ...]  # sections that changed but only apply at the next start


def reload_config(gateway: Gateway) -> Reloaded:
    """Swap in the config file's current models, prices, providers, groups, limits and routing.
    Raises ConfigError (and changes nothing) when the file is missing or invalid."""
    old = gateway.settings
    if not Path(old.source).is_file():
        raise ConfigError(f"this gateway runs on {old.source}, not a config file: there is nothing to reload")
    new = load_settings(old.source)
    # (the settings hold the file's host and port, whatever `serve --host/--port` listens on)
    needs_restart = tuple(name for name in FIXED_AT_START if getattr(new, name) != getattr(old, name))
    new = replace(new, **{name: getattr(old, name) for name in FIXED_AT_START})
    providers = build_providers(new, gateway.session)
    # One assignment each, no await between them: a request reads either the old set or the new one.
    gateway.settings, gateway.providers, gateway.router = new, providers, Router(new)
    done = Reloaded(new.source, len(new.models), len(new.providers), needs_restart)
    log.info("reloaded %s: %d models, %d providers%s", done.source, done.models, done.providers,
             f"; changes to {', '.join(needs_restart)} apply at the next restart" if needs_restart else "")
    return done


def reload_or_log(gateway: Gateway) -> None:
    """For signal handlers and Redis: reload, or log why not and keep serving as before."""
    try:
        reload_config(gateway)
    except ApiboxError as exc:
        log.error("config not reloaded, still serving the previous one: %s", exc.message)
