"""Live gateways with changed settings (limits, trusted proxies, admin key, caps) and a plain HTTP
client for the fair-use, admin-API and fuzz tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict

from apibox.config import LimitDefaults, LimitSet, Settings
from apibox.store import open_store
from apibox.store.base import Store
from tests.conftest import Live, ServerThread
from tests.fake_upstream import FakeUpstream

Change = Callable[[Settings], Settings]
ADMIN_KEY = "admin-SECRET-key-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "hello"}]
CHAT = {"model": "gpt-fake", "messages": MESSAGES}


class Variant(ServerThread):
    """A live gateway whose loaded settings are changed by ``changes`` before it starts."""

    def __init__(self, tmp_path: Path, database_url: str, fake: FakeUpstream, *changes: Change) -> None:
        super().__init__(tmp_path, database_url, fake)
        self.changes = changes

    def configure(self, settings: Settings) -> Settings:
        for change in self.changes:
            settings = change(settings)
        return settings


def server(**fields: Any) -> Change:
    """Change fields of ``settings.server``, e.g. ``server(admin_key=...)``."""
    return lambda settings: replace(settings, server=replace(settings.server, **fields))


def limits(key: LimitSet | None = None, user: LimitSet | None = None) -> Change:
    """Default limits for keys and users, as the config's ``limits:`` section gives them."""
    return lambda settings: replace(settings, limits=LimitDefaults(key=key or LimitSet(), user=user or LimitSet()))


@asynccontextmanager
async def store_of(live: Live) -> AsyncIterator[Store]:
    """A second connection to a live gateway's database."""
    db = await open_store(live.settings.database.url)
    try:
        yield db
    finally:
        await db.close()


async def request(live: Live, method: str, path: str, *, key: str | None = None, json_body: Any = None,
                  data: bytes | None = None, headers: dict[str, str] | None = None,
                  ) -> tuple[int, CIMultiDict[str], bytes]:
    """One request to ``live.url + path``: (status, headers, body)."""
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    if json_body is not None:
        data = json.dumps(json_body).encode()
    if data is not None:
        sent.setdefault("Content-Type", "application/json")
    async with aiohttp.ClientSession() as session, session.request(
            method, f"{live.url}{path}", data=data, headers=sent) as response:
        return response.status, CIMultiDict(response.headers), await response.read()


def openai_error(raw: bytes) -> dict[str, Any]:
    """The ``error`` object of an OpenAI-shaped error body, checked for its exact shape."""
    body = json.loads(raw)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]
