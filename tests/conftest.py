"""Shared fixtures: an isolated working directory, a real SQLite file, a live gateway.

The live gateway runs in its own thread and event loop (beside the fake upstream), so the
official SDKs, sync and async, can call it over real TCP exactly as users do.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from aiohttp import web
from typer.testing import CliRunner

from apibox import accounts
from apibox.cli.main import app as cli_app
from apibox.config import Settings, load_settings
from apibox.gateway.app import create_app
from apibox.store import open_store
from apibox.store.base import Store
from tests.fake_anthropic import ANTHROPIC_KEY, FakeAnthropic
from tests.fake_gemini import GEMINI_KEY, FakeGemini
from tests.fake_upstream import UPSTREAM_KEY, FakeUpstream

CONFIG_TEMPLATE = """
database:
  url: sqlite:///{db}
providers:
  - {{name: echo, type: echo}}
  - name: fake
    type: openai
    base_url: {upstream}/v1
    api_key: ${{FAKE_UPSTREAM_KEY}}
  - name: fake-backup
    type: openai
    base_url: {upstream}/v1
    api_key: ${{FAKE_UPSTREAM_KEY}}
  - name: claude
    type: anthropic
    base_url: {upstream}
    api_key: ${{FAKE_ANTHROPIC_KEY}}
  - name: google
    type: gemini
    base_url: {upstream}/v1beta
    api_key: ${{FAKE_GEMINI_KEY}}
models:
  - name: demo
    routes: [{{provider: echo}}]
    price: {{input: 5, output: 15}}
    max_output_tokens: 1024
  - name: gpt-fake
    routes: [{{provider: fake, model: fake-model-1}}]
    price: {{input: 2.5, output: 10, cached_input: 1.25}}
    max_output_tokens: 1000
  - name: gpt-fallback
    routes:
      - {{provider: fake, model: fake-primary, priority: 1}}
      - {{provider: fake-backup, model: fake-secondary, priority: 2}}
    price: {{input: 2.5, output: 10}}
    max_output_tokens: 1000
  - name: claude-fake
    routes: [{{provider: claude, model: claude-upstream-1}}]
    price: {{input: 3, output: 15, cached_input: 0.3, cache_write: 3.75}}
    max_output_tokens: 1000
  - name: gemini-fake
    routes: [{{provider: google, model: gemini-upstream-1}}]
    price: {{input: 0.3, output: 2.5, cached_input: 0.075}}
    max_output_tokens: 1000
  - name: claude-with-fallback
    routes:
      - {{provider: fake, model: fake-primary, priority: 1}}
      - {{provider: claude, model: claude-upstream-2, priority: 2}}
    price: {{input: 3, output: 15}}
    max_output_tokens: 1000
  - name: embed-fake
    kind: embedding
    routes: [{{provider: fake, model: emb-1}}]
    price: {{input: 0.02, output: 0}}
groups:
  vip: {{multiplier: 0.8}}
  trial: {{multiplier: 1, models: [demo, gpt-fake]}}
"""


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test runs in its own empty directory with no apibox config from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("APIBOX_CONFIG", raising=False)
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("FAKE_ANTHROPIC_KEY", ANTHROPIC_KEY)
    monkeypatch.setenv("FAKE_GEMINI_KEY", GEMINI_KEY)
    return tmp_path


def write_config(tmp_path: Path, upstream: str = "http://127.0.0.1:9") -> Path:
    path = tmp_path / "apibox-test.yaml"
    path.write_text(CONFIG_TEMPLATE.format(db=tmp_path / "apibox.db", upstream=upstream))
    return path


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """A config file (fake upstream address unused) for CLI and store tests."""
    return write_config(tmp_path)


@pytest.fixture
def cli(config_path: Path):
    """Run the real CLI in-process: cli("users", "create", "a@b.c") -> Result."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(cli_app, [*args, "--config", str(config_path)] if args and args[0] != "--help"
                             else list(args), env={"COLUMNS": "200"})
    return invoke


def assert_books_balance(config: Path) -> None:
    """`apibox db check` must pass after every test that moves money."""
    result = CliRunner().invoke(cli_app, ["db", "check", "--config", str(config)])
    assert result.exit_code == 0, result.output


@asynccontextmanager
async def opened_store(config_path: Path) -> AsyncIterator[Store]:
    """The config's database, opened; after the block the store's audit must be empty and the books
    must balance (`apibox db check`, run off the event loop because the CLI calls asyncio.run)."""
    db = await open_store(load_settings(str(config_path)).database.url)
    yield db
    problems = await db.audit()
    await db.close()
    assert problems == []
    await asyncio.to_thread(assert_books_balance, config_path)


@pytest.fixture
async def store(config_path: Path) -> AsyncIterator[Store]:
    async with opened_store(config_path) as db:
        yield db


async def fund(db: Store, settings: Settings, email: str, usd: str, **key_options: object) -> str:
    """A user with a key and a top-up; returns the key's secret."""
    await accounts.create_user(db, email)
    new = await accounts.create_key(db, email, accounts.KeyOptions(**key_options),  # type: ignore[arg-type]
                                    known_models=settings.model_index())
    if usd != "0":
        await accounts.topup(db, email, usd)
    return new.secret


@dataclass
class Live:
    """A running gateway and its fake upstream."""

    url: str
    fake: FakeUpstream
    config_path: Path
    settings: Settings
    anthropic: FakeAnthropic
    gemini: FakeGemini

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


class ServerThread:
    """The gateway and the fake upstream on one event loop in a background thread."""

    def __init__(self, tmp_path: Path, fake: FakeUpstream, anthropic: FakeAnthropic | None = None,
                 gemini: FakeGemini | None = None) -> None:
        self.tmp_path, self.fake = tmp_path, fake
        self.anthropic, self.gemini = anthropic or FakeAnthropic(), gemini or FakeGemini()
        self.clock: Callable[[], datetime] | None = None  # the gateway's clock, for price schedules
        self.loop = asyncio.new_event_loop()
        self.runners: list[web.AppRunner] = []
        self.live: Live | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> Live:
        self.thread.start()
        self.live = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self.live

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def _start(self) -> Live:
        upstream_app = self.fake.app()  # one server speaks all three formats: their paths differ
        self.anthropic.add_routes(upstream_app)
        self.gemini.add_routes(upstream_app)
        upstream = await self._serve(upstream_app)
        config = write_config(self.tmp_path, upstream)
        settings = self.configure(load_settings(str(config)))
        url = await self._serve(create_app(settings, clock=self.clock))
        return Live(url, self.fake, config, settings, self.anthropic, self.gemini)

    def configure(self, settings: Settings) -> Settings:
        """The settings the gateway runs with; a subclass may change the loaded ones."""
        return settings

    def stop(self) -> None:
        async def cleanup() -> None:
            for runner in reversed(self.runners):
                await runner.cleanup()
        asyncio.run_coroutine_threadsafe(cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream()


@contextmanager
def serving(server: ServerThread) -> Iterator[Live]:
    """Run ``server`` for the block, stop it, then require the books to balance."""
    running = server.start()
    try:
        yield running
    finally:
        server.stop()
    assert_books_balance(running.config_path)


@pytest.fixture
def live(tmp_path: Path, fake: FakeUpstream) -> Iterator[Live]:
    """A live gateway on a real SQLite file, in front of the fake upstream; books checked after."""
    with serving(ServerThread(tmp_path, fake)) as running:
        yield running


@pytest.fixture
async def live_store(live: Live) -> AsyncIterator[Store]:
    """A second connection to the live gateway's database, for the test's own reads and writes."""
    db = await open_store(live.settings.database.url)
    yield db
    await db.close()
