"""Shared fixtures: an isolated working directory, a real database on each engine, a live gateway.

Every test that touches a database runs twice, on SQLite and on PostgreSQL: it asks (directly or
through ``config_path``, ``store``, ``live``...) for ``database_url``, which is parametrized by the
session-scoped ``engine`` (ids ``sqlite`` and ``postgresql``: ``-k "not postgresql"`` leaves one out). A
SQLite database is a fresh file in the test's ``tmp_path``, a copy of one migrated once for the
session; a PostgreSQL one a fresh database (or schema: see ``PostgresDatabase``) on the session's
server, migrated, dropped after the test. Tests marked ``empty_database``, and
``databases.new(migrated=False)``, start from an empty one.
Tests marked ``sqlite_only`` (they are about SQLite's files or its upgrade path) run on SQLite alone, and
those marked ``postgresql_only`` (a database server that goes away) on PostgreSQL alone.
Pure unit tests ask for no database and run once. The PostgreSQL and Redis servers come from tests/services.py.

The live gateway runs in its own thread and event loop (beside the fake upstream), so the
official SDKs, sync and async, can call it over real TCP exactly as users do.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest
import typer.main
import typer.testing
from aiohttp import web
from typer.testing import CliRunner

from apibox import accounts
from apibox.cli.main import app as cli_app
from apibox.config import Settings, load_settings
from apibox.gateway.app import create_app
from apibox.store import open_store
from apibox.store.base import Store
from tests import dbquery, services
from tests.fake_anthropic import ANTHROPIC_KEY, FakeAnthropic
from tests.fake_gemini import GEMINI_KEY, FakeGemini
from tests.fake_upstream import UPSTREAM_KEY, FakeUpstream

T = TypeVar("T")

# typer's CliRunner builds the click command tree from the app's function signatures on every
# invoke: 33 ms, as much as most CLI commands take to run, for a tree that never changes. The
# suite invokes the CLI thousands of times (every test that moves money ends with `db check`),
# so the tree is built once per app. `apibox` itself builds it once per process, as before.
typer.testing._get_command = functools.cache(typer.main.get_command)  # type: ignore[attr-defined]

ENGINES = ("sqlite", "postgresql")

CONFIG_TEMPLATE = """
database:
  url: {db}
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
  - name: fake-openai
    type: openai
    base_url: {upstream}/v1
    api_key: ${{FAKE_UPSTREAM_KEY}}
    max_tokens_field: max_completion_tokens
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
  - name: o-fake
    routes: [{{provider: fake-openai, model: o-reasoner-1}}]
    price: {{input: 2, output: 8}}
    max_output_tokens: 1000
  - name: o-behind-proxy
    routes: [{{provider: fake, model: o-reasoner-2}}]
    price: {{input: 2, output: 8}}
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
  - name: claude-then-gpt
    routes:
      - {{provider: claude, model: claude-upstream-1, priority: 1}}
      - {{provider: fake, model: fake-model-1, priority: 2}}
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


# -- the engines ---------------------------------------------------------------------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that needs a database once per engine (``sqlite_only`` ones on SQLite alone).
    Session-scoped, so pytest runs all the SQLite cases, then all the PostgreSQL ones."""
    if "engine" in metafunc.fixturenames:
        engines = ["sqlite"] if metafunc.definition.get_closest_marker("sqlite_only") else list(ENGINES)
        if metafunc.definition.get_closest_marker("postgresql_only"):
            engines = ["postgresql"]
        metafunc.parametrize("engine", engines, indirect=True, scope="session")


@pytest.fixture(scope="session")
def engine(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgresql``: the engine this test case runs on."""
    return request.param


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a PostgreSQL server for the session: ``$APIBOX_TEST_POSTGRES_URL``, else one started
    here (tests/services.py) and stopped at the end."""
    yield from _server(services.POSTGRES_ENV, services.start_postgres)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The URL of a Redis server for the session: ``$APIBOX_TEST_REDIS_URL``, else one started here."""
    yield from _server(services.REDIS_ENV, services.start_redis)


def _server(env: str, start: Callable[[], services.Started]) -> Iterator[str]:
    if os.environ.get(env):
        yield os.environ[env]
        return
    try:
        started = start()
    except services.ServiceUnavailable as error:
        problem = str(error)  # failed below, outside this handler: one message, no chained traceback
    else:
        problem = ""
    if problem:
        pytest.fail(problem, pytrace=False)
    try:
        yield started.url
    finally:
        started.stop()


class PostgresDatabase:
    """The session's PostgreSQL server, handing out fresh databases, each dropped after its test.

    Made one of two ways, chosen when the session starts. Where the server keeps its files in
    memory (tests/services.py puts them in /dev/shm when there is room), a test's database is a
    copy of a template migrated once: 16 ms with two workers copying at once, against 55 ms (idle)
    for the migrations. Elsewhere it is a schema of one database of this worker's, migrated for
    its test, since a copy is hundreds of files and on this VM's disk, after a suite's worth of
    copies, took 200 ms. ``create(migrated=False)`` gives an empty one either way."""

    def __init__(self, server_url: str) -> None:
        parts = urlsplit(server_url)
        self.query = parse_qsl(parts.query)
        self.server_url = server_url
        home = parts.path.lstrip("/") or "postgres"  # the URL's own database: where databases are made
        self.admin_url = self._with(home, application_name="apibox-tests")
        # Drops run on a connection of their own, in the background while the next test runs; a
        # dropped database's connections are ended (WITH (FORCE)), a schema's drop gives up after
        # 10 s rather than hang behind a connection a test left in a transaction.
        dropper = {"application_name": "apibox-tests-drop", "lock_timeout": "10000"}
        self.drop_url = self._with(home, **dropper)
        self.dropping: dict[str, Future[Any]] = {}
        self.copies = self._files_in_memory()
        self.home = self._fresh_name("tpl" if self.copies else "schemas")
        self._copy("template0", self.home)
        # a schema is dropped from inside the worker's database, a database from the server's own
        self.drop_home_url = self.drop_url if self.copies else self._with(self.home, **dropper)
        if self.copies:
            dbquery.run_coroutine(_migrate(self._with(self.home)))
            # No connection, autovacuum's included, may hold the template while it is copied.
            dbquery.execute(self.admin_url, f"ALTER DATABASE {self.home} WITH ALLOW_CONNECTIONS false")

    def _files_in_memory(self) -> bool:
        """Whether the server's data directory is on a tmpfs of this machine (not if it may not say)."""
        try:
            directory = dbquery.query(self.admin_url, "SELECT current_setting('data_directory')")[0][0]
        except asyncpg.PostgresError:
            return False
        return services.in_memory(Path(directory))

    @staticmethod
    def _fresh_name(prefix: str) -> str:
        return f"{prefix}_{uuid.uuid4().hex[:16]}"

    def _with(self, database: str, **settings: str) -> str:
        parts = urlsplit(self.server_url)
        return urlunsplit(parts._replace(path=f"/{database}", query=urlencode([*self.query, *settings.items()])))

    def _url(self, name: str) -> str:
        return self._with(name) if self.copies else self._with(self.home, search_path=name)

    def create(self, *, migrated: bool = True) -> tuple[str, str]:
        """A new database (or schema), migrated or empty: (name, URL)."""
        name = self._fresh_name("t")
        if self.copies:
            self._copy(self.home if migrated else "template0", name)
            return name, self._url(name)
        dbquery.execute(self._with(self.home), f"CREATE SCHEMA {name}")
        if migrated:
            dbquery.run_coroutine(_migrate(self._url(name)))
        return name, self._url(name)

    def _copy(self, template: str, name: str) -> None:
        """Create the database ``name`` as a file copy of ``template`` (16 ms, against 23 for a copy
        through the WAL). The templates refuse connections, so no session holds them; a copy that
        finds one in use anyway (by PostgreSQL's own workers) waits."""
        for attempt in range(50):
            try:
                dbquery.execute(self.admin_url, f"CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY")
                return
            except asyncpg.ObjectInUseError:
                if attempt == 49:
                    raise
                time.sleep(0.1)

    def _drop_sql(self, name: str) -> str:
        return (f"DROP DATABASE IF EXISTS {name} WITH (FORCE)" if self.copies
                else f"DROP SCHEMA IF EXISTS {name} CASCADE")

    def drop(self, name: str) -> None:
        """Drop the database soon (the test's cached dbquery connection to it is closed now)."""
        dbquery.forget(self._url(name))
        self.dropping[name] = dbquery.execute_soon(self.drop_home_url, self._drop_sql(name))
        for done in [n for n, future in self.dropping.items() if future.done() and not future.exception()]:
            del self.dropping[done]

    def close(self) -> None:
        """Wait for the drops (one that failed is tried once more), then drop the worker's own database."""
        for name, future in list(self.dropping.items()):
            with suppress(asyncpg.PostgresError):
                if future.exception(timeout=60) is not None:
                    dbquery.execute(self.drop_home_url, self._drop_sql(name))
        for url in (self.drop_home_url, self._with(self.home)):
            dbquery.forget(url)
        with suppress(asyncpg.PostgresError):
            dbquery.execute(self.drop_url, f"DROP DATABASE IF EXISTS {self.home} WITH (FORCE)")
        for url in (self.admin_url, self.drop_url):
            dbquery.forget(url)


async def _migrate(url: str) -> None:
    """Open the store at ``url`` once: it applies every migration."""
    await (await open_store(url)).close()


@pytest.fixture(scope="session")
def postgres_database(postgres_server: str) -> Iterator[PostgresDatabase]:
    database = PostgresDatabase(postgres_server)
    yield database
    database.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once for the session: a test's database is a copy of it."""
    path = tmp_path_factory.mktemp("template") / "migrated.db"
    dbquery.run_coroutine(_migrate(f"sqlite:///{path}"))
    return path


class Databases:
    """Fresh databases of one engine, migrated unless asked otherwise: SQLite files in ``directory``
    or PostgreSQL databases. ``close()`` drops the PostgreSQL ones (the files go with the directory)."""

    def __init__(self, engine: str, directory: Path, template: Path | None, postgres: PostgresDatabase | None) -> None:
        self.engine, self.directory, self.template, self.postgres = engine, directory, template, postgres
        self.names: dict[str, str] = {}  # URL -> PostgreSQL database name
        self.count = 0

    def new(self, name: str | None = None, *, migrated: bool = True) -> str:
        """The URL of a new database, migrated (``migrated=False``: empty; ``name``: a SQLite file's
        stem). Copying a migrated template takes a fraction of the time its migrations take."""
        self.count += 1
        if self.engine == "sqlite":
            path = self.directory / f"{name or f'db-{self.count}'}.db"
            if migrated:
                assert self.template is not None
                shutil.copyfile(self.template, path)
            return f"sqlite:///{path}"
        assert self.postgres is not None
        database, url = self.postgres.create(migrated=migrated)
        self.names[url] = database
        return url

    def drop(self, url: str) -> None:
        """Remove a database now (a PostgreSQL one; a SQLite file is left to the directory's cleanup)."""
        if url in self.names and self.postgres is not None:
            self.postgres.drop(self.names.pop(url))

    def close(self) -> None:
        for url in list(self.names):
            self.drop(url)


def databases_for(engine: str, directory: Path, request: pytest.FixtureRequest) -> Databases:
    """A ``Databases`` for any fixture scope (PostgreSQL's server is only started when needed)."""
    if engine == "sqlite":
        return Databases(engine, directory, request.getfixturevalue("sqlite_template"), None)
    return Databases(engine, directory, None, request.getfixturevalue("postgres_database"))


@pytest.fixture
def databases(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Databases]:
    """Make more fresh databases of this test's engine (``databases.new()``); all dropped after it."""
    made = databases_for(engine, tmp_path, request)
    yield made
    made.close()


@pytest.fixture
def database_url(databases: Databases, request: pytest.FixtureRequest) -> str:
    """The test's database: ``sqlite:///{tmp_path}/apibox.db`` or a fresh PostgreSQL one, migrated
    unless the test is marked ``empty_database``."""
    return databases.new("apibox", migrated=request.node.get_closest_marker("empty_database") is None)


# -- the working directory, the config, the store ---------------------------------------------------


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test runs in its own empty directory with no apibox config from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("APIBOX_CONFIG", raising=False)
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("FAKE_ANTHROPIC_KEY", ANTHROPIC_KEY)
    monkeypatch.setenv("FAKE_GEMINI_KEY", GEMINI_KEY)
    return tmp_path


def write_config(tmp_path: Path, database_url: str, upstream: str = "http://127.0.0.1:9") -> Path:
    path = tmp_path / "apibox-test.yaml"
    path.write_text(CONFIG_TEMPLATE.format(db=database_url, upstream=upstream))
    return path


@pytest.fixture
def config_path(tmp_path: Path, database_url: str) -> Path:
    """A config file (fake upstream address unused) for CLI and store tests."""
    return write_config(tmp_path, database_url)


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
    loop: asyncio.AbstractEventLoop  # the gateway's, in its own thread

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    async def in_gateway_thread(self, call: Callable[[], T]) -> T:
        """``call()`` run on the gateway's thread (for what is per thread, such as the asyncgen hooks)."""
        async def run() -> T:
            return call()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), self.loop))


class ServerThread:
    """The gateway and the fake upstream on one event loop in a background thread."""

    def __init__(self, tmp_path: Path, database_url: str, fake: FakeUpstream, anthropic: FakeAnthropic | None = None,
                 gemini: FakeGemini | None = None) -> None:
        self.tmp_path, self.database_url, self.fake = tmp_path, database_url, fake
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
        config = write_config(self.tmp_path, self.database_url, upstream)
        settings = self.configure(load_settings(str(config)))
        url = await self._serve(create_app(settings, clock=self.clock))
        return Live(url, self.fake, config, settings, self.anthropic, self.gemini, self.loop)

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
def live(tmp_path: Path, database_url: str, fake: FakeUpstream) -> Iterator[Live]:
    """A live gateway on the test's database, in front of the fake upstream; books checked after."""
    with serving(ServerThread(tmp_path, database_url, fake)) as running:
        yield running


@pytest.fixture
async def live_store(live: Live) -> AsyncIterator[Store]:
    """A second connection to the live gateway's database, for the test's own reads and writes."""
    db = await open_store(live.settings.database.url)
    yield db
    await db.close()
