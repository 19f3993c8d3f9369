"""What the settings are: frozen dataclasses with their defaults (pure).

``apibox.config`` reads and validates YAML into these; everything else only reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from apibox.pricing import MULTIPLIER_ONE, Price

PROVIDER_TYPES = ("openai", "anthropic", "gemini", "echo")
ACCESS_LOG_FORMATS = ("json", "none")
DEFAULT_BASE_URLS = {"anthropic": "https://api.anthropic.com", "gemini": "https://generativelanguage.googleapis.com/v1beta"}
DEFAULT_CONFIG_NAME = "apibox.yaml"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    admin_key: str | None = None
    max_body_mb: float = 20.0
    # Proxies whose X-Forwarded-For is believed (CIDRs); other peers are taken at their address.
    trusted_proxies: tuple[str, ...] = ()
    failed_auth_per_minute: int = 30  # bad keys from one address before it is refused for a while
    max_in_flight: int = 4096  # requests served at once; more get 503 at once instead of queueing
    access_log: str = "none"  # json: one JSON line per request on the apibox.access logger
    # Web pages that may call the API (/v1) from a browser (CORS): "*" any, as OpenAI's API allows;
    # else each origin, "https://app.example.com"; none: no page may.
    cors_origins: tuple[str, ...] = ("*",)
    # A stream its upstream leaves silent this long gets a ": keep-alive" comment (0: never), so
    # proxies that cut idle connections (nginx after 60 s, Cloudflare after 100 s) keep it open.
    stream_keepalive_seconds: float = 15.0
    # On SIGTERM or SIGINT, how long the requests in flight are given to finish; those still
    # running then are cut, and charged what they delivered.
    shutdown_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    url: str = "sqlite:///./apibox.db"
    pool_size: int = 10  # PostgreSQL connections per gateway process (SQLite: unused)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 10.0
    # Until the upstream's response headers arrive, which for an answer not streamed is when the
    # whole answer is written: minutes for a long one from a reasoning model. The official OpenAI
    # and Anthropic SDKs wait 600 s; giving up sooner fails a request the upstream still bills.
    first_byte: float = 600.0
    # The longest silence between two stream chunks; a reasoning model may think that long
    # between its first chunk and its answer.
    idle: float = 300.0


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    name: str
    type: str
    base_url: str = ""
    api_key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeouts: Timeouts = field(default_factory=Timeouts)
    # Ask OpenAI-compatible upstreams for usage in streams (some old servers reject it).
    stream_usage: bool = True
    # An HTTP(S) proxy every request to this upstream goes through: http://[user:password@]host:port.
    proxy: str | None = None
    # The field an OpenAI-compatible upstream takes a chat answer's length limit in: OpenAI's
    # reasoning models refuse max_tokens, and many other servers know only max_tokens.
    max_tokens_field: str = "max_tokens"


@dataclass(frozen=True, slots=True)
class Route:
    provider: str
    model: str  # the upstream's model name
    weight: int = 1
    priority: int = 1


@dataclass(frozen=True, slots=True)
class ModelSettings:
    name: str
    routes: tuple[Route, ...]
    price: Price
    max_output_tokens: int = 4096
    aliases: tuple[str, ...] = ()
    kind: str = "chat"  # chat | embedding
    # Announced changes, in time order: each price applies from its moment on.
    schedule: tuple[tuple[datetime, Price], ...] = ()

    def price_at(self, moment: datetime) -> Price:
        """The price in force at ``moment`` (a request is priced when it arrives)."""
        current = self.price
        for starts, price in self.schedule:
            if starts > moment:
                break
            current = price
        return current

    def next_change(self, moment: datetime) -> tuple[datetime, Price] | None:
        return next(((starts, price) for starts, price in self.schedule if starts > moment), None)


@dataclass(frozen=True, slots=True)
class Group:
    """A pricing tier: a multiplier on every price (millionths) and optionally the models it may use."""

    multiplier: int = MULTIPLIER_ONE
    models: tuple[str, ...] = ()  # empty: every model


DEFAULT_GROUP = Group()


@dataclass(frozen=True, slots=True)
class LimitSet:
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class LimitDefaults:
    key: LimitSet = field(default_factory=LimitSet)
    user: LimitSet = field(default_factory=LimitSet)


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    failures_before_cooldown: int = 3  # failures in a row that cool a route down
    cooldown_seconds: float = 30.0  # how long a cooled route waits before it is tried again


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """One Redis shared by every gateway process: rate and concurrency limits, cache invalidations."""

    url: str  # redis://[:password@]host:port/db, rediss:// (TLS) or unix:///path/redis.sock
    prefix: str = "apibox"  # every key and channel starts with it, so several deployments can share one Redis
    timeout: float = 0.25  # seconds one Redis call may take; slower counts as Redis being away


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    providers: tuple[ProviderSettings, ...] = ()
    models: tuple[ModelSettings, ...] = ()
    limits: LimitDefaults = field(default_factory=LimitDefaults)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    groups: Mapping[str, Group] = field(default_factory=dict)
    redis: RedisSettings | None = None  # None: limits in each process, no invalidations to publish
    source: str = "built-in defaults"

    def group(self, name: str) -> Group:
        """A user's group; one the config does not name (such as "default") has multiplier 1."""
        return self.groups.get(name) or DEFAULT_GROUP

    def provider(self, name: str) -> ProviderSettings:
        return next(p for p in self.providers if p.name == name)

    def model_index(self) -> dict[str, ModelSettings]:
        """Every name a client may ask for (names and aliases) -> its model."""
        index: dict[str, ModelSettings] = {}
        for model in self.models:
            index[model.name] = model
            for alias in model.aliases:
                index[alias] = model
        return index


def default_settings() -> Settings:
    """What `apibox serve` runs with when there is no config: SQLite and the demo model."""
    return Settings(
        providers=(ProviderSettings(name="echo", type="echo"),),
        models=(
            ModelSettings(
                name="demo",
                routes=(Route(provider="echo", model="echo-1"),),
                price=Price(input=5_000_000, output=15_000_000),
                max_output_tokens=1024,
            ),
        ),
    )
