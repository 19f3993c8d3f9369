"""Typed keys for the state the gateway keeps on its aiohttp application."""

from __future__ import annotations

from aiohttp import web

from apibox.config import Settings
from apibox.gateway.context import Gateway

SETTINGS = web.AppKey("settings", Settings)
GATEWAY = web.AppKey("gateway", Gateway)
# The process id of the supervisor of `serve --workers N`, in each of its workers (absent otherwise)
SUPERVISOR = web.AppKey("supervisor", int)
